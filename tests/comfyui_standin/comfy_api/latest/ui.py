"""Stand-in of comfy_api.latest.ui: the UI outputs the pack uses."""


class PreviewText:
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}


class PreviewImage:
    def __init__(self, image, **kwargs):
        self.image = image

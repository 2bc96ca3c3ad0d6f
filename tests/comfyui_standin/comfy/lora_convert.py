"""Stand-in of comfy.lora_convert."""


def convert_lora(sd):
    return sd

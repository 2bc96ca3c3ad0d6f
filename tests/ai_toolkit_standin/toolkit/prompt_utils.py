"""Stand-in of ai-toolkit's PromptEmbeds: text embeds (and pooled embeds) with to / clone / detach."""


class PromptEmbeds:
    def __init__(self, args, attention_mask=None):
        if isinstance(args, (list, tuple)):
            self.text_embeds, self.pooled_embeds = args[0], args[1]
        else:
            self.text_embeds, self.pooled_embeds = args, None
        self.attention_mask = attention_mask

    def to(self, *args, **kwargs):
        self.text_embeds = self.text_embeds.to(*args, **kwargs)
        return self

    def detach(self):
        return PromptEmbeds(self.text_embeds.detach())

    def clone(self):
        return PromptEmbeds(self.text_embeds.clone())

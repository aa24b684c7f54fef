"""The dense drafter: continuations of the store's nearest keys that start with ``y``."""

from __future__ import annotations

from dresd.drafters.base import Draft, Drafter, DraftRequest


class StoreDrafter(Drafter):
    name = "dense"

    def __init__(self, store, k: int = 10, nprobe: int = 0):
        self.store = store
        self.k = k
        self.nprobe = nprobe or None
        self.transform = store.transform
        self.eos = store.eos_token_id

    @classmethod
    def from_config(cls, store, config) -> StoreDrafter:
        return cls(store, k=config.k, nprobe=config.nprobe)

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        width = prompt_hidden.shape[-1]
        if width != self.transform.input_dim:
            spec = self.store.manifest.model
            raise ValueError(
                f"store {self.store.path} keys hidden states of size {self.transform.input_dim} "
                f"(model {spec.name}, {spec.model_type}); this model's are {width}"
            )

    def propose(self, request: DraftRequest) -> list[Draft]:
        query = self.transform.torch_apply(request.hidden[None])[0].cpu().numpy()
        y = int(request.tokens[-1])
        drafts = []
        for cont, score in self.store.continuations(query, y, self.k, self.nprobe):
            toks = cont[: request.draft_len].tolist()
            if self.eos in toks:  # nothing after EOS is ever decoded
                toks = toks[: toks.index(self.eos) + 1]
            if toks:
                drafts.append(Draft(tuple(toks), score, self.name))
        return drafts

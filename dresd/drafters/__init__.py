"""Drafters: every source of draft tokens implements ``Drafter``, so the decoder never branches
on where drafts come from."""

from dresd.drafters.base import Draft, Drafter, DraftRequest

__all__ = ["Draft", "DraftRequest", "Drafter"]

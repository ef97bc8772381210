"""Placeholder tokens (``<v1>``, ``<v2>``, ...): one place that adds, initialises, trains and saves them.

Used by all three methods. ``add_placeholder_tokens`` appends the tokens to the tokenizer and the text
encoder's embedding table. ``PlaceholderEmbedding`` then swaps the text encoder's token embedding for a module
that keeps the original table frozen and looks the new rows up in a small trainable parameter: every other row
stays bit-identical by construction, and the optimiser holds state for a few rows instead of 49,408.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError

NOISE_INIT = re.compile(r"^noise(?::(?P<std>[0-9.eE+-]+))?$")


@dataclass(frozen=True)
class TokenSpec:
    """A placeholder ``token`` and how to initialise it: a word (``"person"``) or ``"noise:0.017"``."""

    token: str
    init: str


def parse_init(init: str) -> float | None:
    """Return the std for a ``noise[:std]`` init, or None for a word init."""
    m = NOISE_INIT.match(init.strip())
    if m:
        return float(m.group("std") or 0.017)
    return None


def add_placeholder_tokens(tokenizer, text_encoder, specs: list[TokenSpec], generator: torch.Generator | None = None) -> list[int]:
    """Add each spec's token (one id each) and initialise its embedding row; return the ids.

    A word init copies the mean embedding of the word's sub-tokens; ``noise:std`` draws N(0, std^2).
    A token that already exists in the base vocabulary is refused (it would silently share a learned word).
    """
    ids = []
    for spec in specs:
        if not spec.token or any(c.isspace() for c in spec.token):
            raise UserError(f"placeholder token {spec.token!r} must be one word without spaces")
        existing = tokenizer.convert_tokens_to_ids(spec.token)
        if existing != tokenizer.unk_token_id and spec.token not in tokenizer.get_added_vocab():
            raise UserError(f"placeholder {spec.token!r} is already a word of the tokenizer; pick another, e.g. <{spec.token}>")
        tokenizer.add_tokens([spec.token])
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    for spec in specs:
        tid = tokenizer.convert_tokens_to_ids(spec.token)
        if len(tokenizer.encode(spec.token, add_special_tokens=False)) != 1:
            raise UserError(f"placeholder {spec.token!r} does not stay a single token")
        with torch.no_grad():
            table[tid] = init_vector(tokenizer, table, spec.init, generator)
        ids.append(tid)
    return ids


def init_vector(tokenizer, table: torch.Tensor, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    std = parse_init(init)
    if std is not None:
        noise = torch.randn(table.shape[1], generator=generator, dtype=torch.float32)
        return (noise * std).to(table.dtype)
    word_ids = tokenizer.encode(init, add_special_tokens=False)
    if not word_ids:
        raise UserError(f"cannot initialise a token from {init!r}: it has no tokens")
    return table[word_ids].float().mean(0).to(table.dtype)


class PlaceholderEmbedding(nn.Module):
    """Token embedding whose placeholder rows live in ``rows`` (trainable); the base table stays frozen."""

    def __init__(self, base: nn.Embedding, token_ids: list[int]):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(base.weight.detach()[self.token_ids].clone().float())

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads for shapes/dtypes
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        match = input_ids.unsqueeze(-1) == self.token_ids  # (..., L, K)
        if not bool(match.any()):
            return out
        which = match.float().to(out.dtype)  # one-hot over placeholder rows
        hit = which.sum(-1, keepdim=True)
        return out * (1 - hit) + which @ self.rows.to(out.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Embedding:
        """Write the trained rows into the base table and return it (for export or plain inference)."""
        self.base.weight[self.token_ids] = self.rows.detach().to(self.base.weight.dtype)
        return self.base


def make_trainable(text_encoder, token_ids: list[int]) -> PlaceholderEmbedding:
    """Swap the text encoder's token embedding for a ``PlaceholderEmbedding`` (idempotent)."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, PlaceholderEmbedding):
        return current
    wrapped = PlaceholderEmbedding(current, token_ids)
    text_encoder.set_input_embeddings(wrapped)
    return wrapped


def merge_trainable(text_encoder) -> None:
    """Undo ``make_trainable``: fold the rows back into a plain ``nn.Embedding``."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, PlaceholderEmbedding):
        text_encoder.set_input_embeddings(current.merge())


def token_vectors(text_encoder, token_ids: list[int]) -> torch.Tensor:
    """The current embedding of each placeholder, whether or not the encoder is wrapped."""
    emb = text_encoder.get_input_embeddings()
    if isinstance(emb, PlaceholderEmbedding):
        index = {int(t): i for i, t in enumerate(emb.token_ids)}
        return torch.stack([emb.rows[index[t]] for t in token_ids]).detach()
    return emb.weight[token_ids].detach()


def find_token_positions(tokenizer, prompt: str, tokens: list[str]) -> dict[str, list[int]]:
    """Positions (in the padded 77-token sequence, BOS at 0) where each placeholder (one token each) occurs in
    ``prompt``; for words of several sub-tokens see :func:`find_word_positions`."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    out = {}
    for tok in tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        out[tok] = [i for i, x in enumerate(ids) if x == tid]
    return out


def find_word_positions(tokenizer, prompt: str, words: list[str]) -> list[list[int]]:
    """Positions of each word's tokens (all sub-tokens, every occurrence) among the prompt's 77 token ids.

    Longer words claim their tokens first ("hair clip" before "hair"). A word not in the prompt is a UserError.
    """
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    taken: set[int] = set()
    found: dict[str, list[int]] = {}
    for word in sorted(set(words), key=lambda w: -len(tokenizer(w, add_special_tokens=False).input_ids)):
        sub = tokenizer(word, add_special_tokens=False).input_ids
        hits = [i for i in range(1, len(ids) - len(sub) + 1)
                if ids[i:i + len(sub)] == sub and not taken.intersection(range(i, i + len(sub)))]
        positions = [i + j for i in hits for j in range(len(sub))]
        if not positions:
            raise UserError(f"the concept word {word!r} is not in the prompt {prompt!r} (use it exactly, e.g. "
                            f"'a {word} ...'; prompts are cut at {tokenizer.model_max_length} tokens)")
        taken.update(positions)
        found[word] = positions
    return [found[w] for w in words]

"""Arrow schemas of a shard's files.

Values are never stored as copied token lists: the value of the key at position ``pos`` is read
from the shard's token stream as ``tokens[pos + 1 : pos + 1 + N]``, clipped to the document's end
and padded with EOS. A key costs its vector plus two integers; a token costs four bytes once.
"""

import pyarrow as pa

# tokens.arrow: all documents of the shard back to back, in docs.arrow order.
TOKENS_SCHEMA = pa.schema([pa.field("token", pa.int32(), nullable=False)])

# docs.arrow: where each document lives in the token stream.
DOCS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),  # sha256 of the document's content
        pa.field("source", pa.string(), nullable=False),  # file path or record locator
        pa.field("start", pa.int64(), nullable=False),  # first token's offset in tokens.arrow
        pa.field("length", pa.int32(), nullable=False),  # number of tokens
    ]
)

# Dead-letter records written by the builder for input it could not use.
DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("excerpt", pa.string(), nullable=True),
    ]
)

KEY_VECTOR_TYPE = pa.float16()


def keys_schema(dim: int) -> pa.Schema:
    """keys.lance: one row per corpus position that has a next token.

    ``vector`` is the transformed (z-score, PCA, L2-normalised) final hidden state h_pos,
    stored as float16; ``pos`` is the position in the shard's token stream; ``next_token`` is
    tokens[pos + 1], the token the model predicts from h_pos, used to filter inside the search.
    """
    return pa.schema(
        [
            pa.field("vector", pa.list_(KEY_VECTOR_TYPE, dim), nullable=False),
            pa.field("pos", pa.int64(), nullable=False),
            pa.field("next_token", pa.int32(), nullable=False),
        ]
    )

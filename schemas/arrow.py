"""Arrow schemas of a shard's files.

Values are never stored as copied token lists: the value of the key at position ``pos`` is read
from the shard's token stream as ``tokens[pos + 1 : pos + 1 + N]``, clipped to the document's end
and padded with EOS. A token costs four bytes once; a key costs one entry of the shard's inverted
lists (a compressed code and an id that packs its next token and position, see schemas.lists).
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

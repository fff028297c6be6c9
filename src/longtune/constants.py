"""Constants shared by the data, loss and parallel layers, defined once."""

from __future__ import annotations

# Label of a position that is not trained (prompt, padding, the last token of a document). The value is the
# `ignore_index` default of torch's cross entropy and of Hugging Face models, so labels interoperate unchanged.
IGNORE_INDEX = -100
# Document id of padding tokens: no real document has it, so document-aware attention never lets a token see
# padding and padding sees nothing.
PAD_DOCUMENT = -1

"""The chunked engine: :mod:`.chunked` runs a row kernel over [tokens, vocab] logits chunk by chunk, writing the
closed-form gradient into one tensor of the student's shape."""

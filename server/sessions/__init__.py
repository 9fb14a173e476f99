"""Remote sessions (service terms, clause 1): consent, the SSH gateway, recording and audit."""

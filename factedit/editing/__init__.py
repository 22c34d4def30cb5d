"""The editing core: requests, records, deltas, the Editor with exact revert, the journal, model specs."""

"""training stage of anomalydiff."""

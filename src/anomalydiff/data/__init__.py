"""data stage of anomalydiff."""

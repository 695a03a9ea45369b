"""models stage of anomalydiff."""

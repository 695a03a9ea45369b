"""methods stage of anomalydiff."""

"""evaluation stage of anomalydiff."""

"""fleettrack's own benchmark (``make bench``) and demo (``make demo``)."""

"""One router per resource, combined in serving.app."""

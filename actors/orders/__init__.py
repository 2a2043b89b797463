"""Orders: the checked status state machine and the order services."""

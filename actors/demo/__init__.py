"""The demo: real CDNOW orders replayed through the running runtime."""

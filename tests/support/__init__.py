"""Test infrastructure: an HTTP Kubernetes API emulator (kmock-based) and a test Job controller."""

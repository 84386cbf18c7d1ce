"""A local Kubernetes cluster on loopback: a real control plane and a node agent that plays the kubelet."""

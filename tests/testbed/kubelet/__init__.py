"""The test bed's fake kubelet: one process that plays a Kubernetes node.

It registers a Node with a real kube-apiserver and binds unscheduled pods to
it, since the bed runs no scheduler. It runs each container's command as a
local process and reports pod status the way a kubelet does. It serves
container logs over HTTPS, so `kubectl logs` works through the API server. Tests can make single
pods misbehave through `faults.py`. README.md one folder up describes it.
"""

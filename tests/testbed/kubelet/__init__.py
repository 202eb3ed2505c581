"""The test bed's fake kubelet: one process that plays a Kubernetes node.

It registers a Node with a real kube-apiserver, binds unscheduled pods to it
(it is the scheduler too), runs each container's command as a local process,
reports pod status the way a kubelet does, and serves container logs over
HTTPS so `kubectl logs` works through the API server. Tests can make single
pods misbehave through `faults.py`. README.md one folder up describes it.
"""

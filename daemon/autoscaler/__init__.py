"""The Kubernetes Cluster Autoscaler's ``externalgrpc`` cloud provider: governord answers the
autoscaler's gRPC calls (service ``clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider``,
externalgrpc.proto beside this file) with the node groups of its applications.

The messages and the service's base classes are generated from the proto (``make protos``)."""

"""What scales applications on their behalf, each through the Governor's rules like any request:

- ``thresholds.py`` (with ``prometheus.py``, its client): the roles' ``autoscale`` rules, a
  Prometheus query's value held above or below a threshold;
- ``service.py`` (with ``template.py``): the Kubernetes Cluster Autoscaler's ``externalgrpc``
  cloud provider: governord answers the autoscaler's gRPC calls (service
  ``clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider``, externalgrpc.proto beside
  this file) with the node groups of its applications. The messages and the service's base
  classes are generated from the protos (``make protos``)."""

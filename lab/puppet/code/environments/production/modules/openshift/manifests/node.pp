# An OpenShift node (lab stand-in: the notify shows up as an event in the run's report).
# provider_id: the kubelet's --provider-id, which governord sets for a Cluster Autoscaler node
# group's host as a Foreman smart class parameter override.
class openshift::node (Optional[String[1]] $provider_id = undef) {
  notify { 'openshift::node applied': }
  if $provider_id {
    notify { "openshift::node kubelet provider-id ${provider_id}": }
  }
}

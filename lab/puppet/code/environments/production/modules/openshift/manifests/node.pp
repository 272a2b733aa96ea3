# An OpenShift node (lab stand-in: the notify shows up as an event in the run's report).
class openshift::node {
  notify { 'openshift::node applied': }
}

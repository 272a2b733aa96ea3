# An OpenShift broker (lab stand-in: the notify shows up as an event in the run's report).
class openshift::broker {
  notify { 'openshift::broker applied': }
}

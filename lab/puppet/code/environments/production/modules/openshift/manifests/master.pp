# An OpenShift master (lab stand-in: the notify shows up as an event in the run's report).
class openshift::master {
  notify { 'openshift::master applied': }
}

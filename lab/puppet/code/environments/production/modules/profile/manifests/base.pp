# The base profile every lab host gets. The notify is the proof, in the run's report, that
# Foreman's classification reached the agent.
class profile::base {
  notify { 'profile::base applied': }
}

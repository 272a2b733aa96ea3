# Classes come from the ENC (Foreman, lab/puppet/enc.py); a node without any gets nothing.
node default {
}

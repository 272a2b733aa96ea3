#!/bin/sh
# shellcheck shell=sh
#
# governord-hook.sh: the body shared by hooks/openshift/deploy, post_deploy, teardown and drained,
# which source it and call `governord_hook deploy|post_deploy|teardown` or `governord_hook drained HOST`. It tells an OpenShift v2 gear from a v4
# lifecycle-hook pod, builds the JSON event, signs it the way governord.webhooks.sign does and
# POSTs it to governord, retrying with the same delivery id. README.md beside it documents the
# variables. POSIX sh plus od, awk, tr, date, mktemp, openssl and curl.

GOVERNORD_HOOK_VERSION=1

governord_log() {
    printf 'governord-hook: %s\n' "$*" >&2
}

# governord_json KEY VALUE [KEY VALUE ...]: a JSON object of the non-empty values as strings.
# awk reads the values from ARGV, which, unlike -v, does not interpret backslashes.
governord_json() {
    LC_ALL=C awk 'BEGIN {
        for (n = 1; n < 32; n++) esc[sprintf("%c", n)] = sprintf("\\u%04x", n)
        esc["\""] = "\\\""; esc["\\"] = "\\\\"
        esc["\n"] = "\\n"; esc["\r"] = "\\r"; esc["\t"] = "\\t"
        out = "{"; sep = ""
        for (i = 1; i + 1 < ARGC; i += 2) {
            value = ARGV[i + 1]
            if (value == "") continue
            s = ""
            for (j = 1; j <= length(value); j++) {
                c = substr(value, j, 1)
                s = s ((c in esc) ? esc[c] : c)
            }
            out = out sep "\"" ARGV[i] "\":\"" s "\""
            sep = ","
        }
        print out "}"
    }' "$@"
}

# governord_pad HEXKEY BYTE: the key, zero-padded to SHA-256's 64-byte block and XORed with
# BYTE, as a printf %b string of \0ooo escapes. Arithmetic only: the key is never an argument.
governord_pad() {
    _rest=$1 _out='' _n=0
    while [ "$_n" -lt 64 ]; do
        if [ -n "$_rest" ]; then
            _byte=$(( 0x${_rest%"${_rest#??}"} ^ $2 ))
            _rest=${_rest#??}
        else
            _byte=$2
        fi
        _out="$_out\\0$(( _byte / 64 ))$(( _byte / 8 % 8 ))$(( _byte % 8 ))"
        _n=$(( _n + 1 ))
    done
    printf '%s' "$_out"
}

# governord_hmac: HMAC-SHA256 (RFC 2104) of stdin under $governord_secret, in lower-case hex.
# Built from plain SHA-256 because `openssl dgst -hmac KEY` would put the key on openssl's
# command line, where anyone who can list processes on the node can read it.
governord_hmac() {
    _key=$(printf '%s' "$governord_secret" | od -An -v -tx1 | tr -d ' \n')
    if [ "${#_key}" -gt 128 ]; then
        _key=$(printf '%s' "$governord_secret" | openssl dgst -sha256 -binary | od -An -v -tx1 | tr -d ' \n')
    fi
    _ipad=$(governord_pad "$_key" 54)
    _opad=$(governord_pad "$_key" 92)
    {
        printf '%b' "$_opad"
        { printf '%b' "$_ipad"; cat; } | openssl dgst -sha256 -binary
    } | openssl dgst -sha256 -binary | od -An -v -tx1 | tr -d ' \n'
    _key='' _ipad='' _opad=''
}

# governord_sign DELIVERY TIMESTAMP BODYFILE: the Governord-Signature value.
governord_sign() {
    _mac=$({ printf '%s.%s.' "$1" "$2"; cat -- "$3"; } | governord_hmac) || return 1
    [ "${#_mac}" -eq 64 ] || return 1
    printf 'v1=%s' "$_mac"
}

# governord_read_secret: sets governord_secret from GOVERNORD_SECRET_FILE or GOVERNORD_SECRET,
# without trailing CR/LF (as governord reads secret files).
governord_read_secret() {
    if [ -n "${GOVERNORD_SECRET_FILE:-}" ]; then
        if [ ! -f "$GOVERNORD_SECRET_FILE" ] || [ ! -r "$GOVERNORD_SECRET_FILE" ]; then
            governord_log "cannot read the secret file GOVERNORD_SECRET_FILE=$GOVERNORD_SECRET_FILE"
            return 2
        fi
        governord_secret=$(cat -- "$GOVERNORD_SECRET_FILE") || return 2
    elif [ -n "${GOVERNORD_SECRET:-}" ]; then
        governord_secret=$GOVERNORD_SECRET
    else
        governord_log "no secret: set GOVERNORD_SECRET_FILE (a file holding the application's webhook secret) or GOVERNORD_SECRET"
        return 2
    fi
    _cr=$(printf '\r') _nl='
'
    while :; do
        case $governord_secret in
            *"$_cr") governord_secret=${governord_secret%"$_cr"} ;;
            *"$_nl") governord_secret=${governord_secret%"$_nl"} ;;
            *) break ;;
        esac
    done
    if [ -z "$governord_secret" ]; then
        governord_log "the webhook secret is empty (GOVERNORD_SECRET_FILE or GOVERNORD_SECRET)"
        return 2
    fi
}

# governord_answer FILE: governord's answer as one line, "reply MESSAGE" for a webhook reply
# (one with a "decision"): its "message" (the decision and its reason: declined and why, held
# for approval and how that is decided), else "DECISION: REASON" (an older governord); else
# "error MESSAGE": the "error" of an {"error", "field"} body, or the body's first line.
# MESSAGE has at most 500 characters. Only the top-level object's string fields are read: the
# request nested in a reply has fields of the same names.
governord_answer() {
    LC_ALL=C awk '
        { body = body (NR > 1 ? "\n" : "") $0 }
        END {
            n = length(body); depth = 0; key = ""; value = 0
            for (i = 1; i <= n; i++) {
                c = substr(body, i, 1)
                if (c == "\"") {
                    s = ""
                    for (i++; i <= n; i++) {
                        c = substr(body, i, 1)
                        if (c == "\"") break
                        if (c == "\\") {
                            i++; c = substr(body, i, 1)
                            if (c == "u") { c = "?"; i += 4 }
                            else if (c == "n" || c == "r" || c == "t" || c == "b" || c == "f") c = " "
                        }
                        s = s c
                    }
                    if (depth == 1) {
                        if (value) { field[key] = s; value = 0 } else key = s
                    }
                } else if (c == "{" || c == "[") depth++
                else if (c == "}" || c == "]") depth--
                else if (depth == 1 && c == ":") value = 1
                else if (depth == 1 && c == ",") { value = 0; key = "" }
            }
            kind = ("decision" in field) ? "reply" : "error"
            if ("message" in field) msg = field["message"]
            else if ("decision" in field) msg = field["decision"] (("reason" in field) ? ": " field["reason"] : "")
            else if ("error" in field) msg = field["error"]
            else { msg = body; sub(/\n.*/, "", msg) }
            gsub(/[\001-\037]/, " ", msg)
            sub(/^ +/, "", msg); sub(/ +$/, "", msg)
            print kind " " substr(msg, 1, 500)
        }' "$1"
}

governord_is_count() {
    case $1 in '' | *[!0-9]*) return 1 ;; esac
}

# governord_run EVENT [HOST]: send one event (HOST: the drained event's host); 0 delivered, 1
# refused or undeliverable, 2 misconfigured. A subshell, so its variables, traps and `set --` stay its own.
governord_run() (
    event=$1
    host=${2:-}

    if [ -n "${OPENSHIFT_DEPLOYMENT_NAME:-}" ] || [ -n "${OPENSHIFT_DEPLOYMENT_NAMESPACE:-}" ]; then
        version=v4
        deployment=${OPENSHIFT_DEPLOYMENT_NAME:-}
        namespace=${OPENSHIFT_DEPLOYMENT_NAMESPACE:-}
        if [ -z "$deployment" ] || [ -z "$namespace" ]; then
            governord_log "a v4 hook pod sets both OPENSHIFT_DEPLOYMENT_NAME and OPENSHIFT_DEPLOYMENT_NAMESPACE; one is missing"
            return 2
        fi
        # the ReplicationController is <DeploymentConfig>-<version>
        case ${deployment##*-} in
            "$deployment" | '' | *[!0-9]*) app=$deployment ;;
            *) app=${deployment%-*} ;;
        esac
        # kubelet sets HOSTNAME to the pod's name in the container's environment
        # shellcheck disable=SC3028
        set -- event "$event" openshift_version v4 app "$app" namespace "$namespace" \
            deployment "$deployment" component "${GOVERNORD_COMPONENT:-}" dns "${GOVERNORD_DNS:-}" \
            pod "${HOSTNAME:-}" host "$host"
    elif [ -n "${OPENSHIFT_APP_NAME:-}" ]; then
        version=v2
        app=$OPENSHIFT_APP_NAME
        namespace=${OPENSHIFT_NAMESPACE:-}
        if [ -z "$namespace" ]; then
            governord_log "OPENSHIFT_APP_NAME is set but OPENSHIFT_NAMESPACE is not: not a v2 gear?"
            return 2
        fi
        set -- event "$event" openshift_version v2 app "$app" namespace "$namespace" \
            component "${GOVERNORD_COMPONENT:-}" dns "${OPENSHIFT_APP_DNS:-}" \
            gear_uuid "${OPENSHIFT_GEAR_UUID:-}" app_uuid "${OPENSHIFT_APP_UUID:-}" \
            branch "${OPENSHIFT_DEPLOYMENT_BRANCH:-}" host "$host"
    else
        governord_log "neither an OpenShift v2 gear (OPENSHIFT_APP_NAME) nor a v4 lifecycle-hook pod (OPENSHIFT_DEPLOYMENT_NAME)"
        return 2
    fi

    url=${GOVERNORD_URL:-}
    case $url in
        https://?*) ;;
        '') governord_log "GOVERNORD_URL is not set (e.g. https://governor.example.com/v1/webhooks/openshift)"; return 2 ;;
        *) governord_log "GOVERNORD_URL must be an https:// URL"; return 2 ;;
    esac
    application=${GOVERNORD_APPLICATION:-$app}
    case $application in
        '' | *[!A-Za-z0-9._-]*)
            governord_log "GOVERNORD_APPLICATION must be a governord application name ([A-Za-z0-9._-])"
            return 2 ;;
    esac
    attempts=${GOVERNORD_ATTEMPTS:-4}
    delay=${GOVERNORD_RETRY_DELAY:-2}
    timeout=${GOVERNORD_TIMEOUT:-30}
    for pair in "GOVERNORD_ATTEMPTS=$attempts" "GOVERNORD_RETRY_DELAY=$delay" "GOVERNORD_TIMEOUT=$timeout"; do
        if ! governord_is_count "${pair#*=}"; then
            governord_log "${pair%%=*} must be a whole number, got '${pair#*=}'"
            return 2
        fi
    done
    [ "$attempts" -ge 1 ] || attempts=1
    for pair in "GOVERNORD_CA_FILE=${GOVERNORD_CA_FILE:-}" "GOVERNORD_CERT_FILE=${GOVERNORD_CERT_FILE:-}" \
        "GOVERNORD_KEY_FILE=${GOVERNORD_KEY_FILE:-}"; do
        file=${pair#*=}
        if [ -n "$file" ] && { [ ! -f "$file" ] || [ ! -r "$file" ]; }; then
            governord_log "cannot read ${pair%%=*}=$file"
            return 2
        fi
    done

    # the secret must not reach an xtrace log (sh -x): tracing is off from here while it is held
    case $- in *x*) set +x ;; esac
    governord_read_secret || return 2

    tmp=$(mktemp -d "${TMPDIR:-/tmp}/governord-hook.XXXXXX") || {
        governord_log "cannot create a temporary directory in ${TMPDIR:-/tmp}"
        return 2
    }
    trap 'rm -rf -- "$tmp"' EXIT
    trap 'exit 1' HUP INT TERM
    governord_json "$@" >"$tmp/body" || return 2
    if [ -r /proc/sys/kernel/random/uuid ]; then
        delivery=$(cat /proc/sys/kernel/random/uuid)
    else
        delivery=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    fi

    # -q first: curl reads no ~/.curlrc, so a curlrc saying `insecure` (or naming a proxy, or
    # another CA) cannot weaken or redirect the delivery
    set -- -q --silent --show-error --proto =https --request POST --data-binary "@$tmp/body" \
        --output "$tmp/response" --write-out '%{http_code}' \
        --connect-timeout 10 --max-time "$timeout" \
        --header 'Content-Type: application/json' --header 'Expect:' \
        --header "User-Agent: governord-hook/$GOVERNORD_HOOK_VERSION" \
        --header "Governord-Delivery: $delivery" --header "Governord-Application: $application"
    [ -z "${GOVERNORD_CA_FILE:-}" ] || set -- "$@" --cacert "$GOVERNORD_CA_FILE"
    [ -z "${GOVERNORD_CERT_FILE:-}" ] || set -- "$@" --cert "$GOVERNORD_CERT_FILE"
    [ -z "${GOVERNORD_KEY_FILE:-}" ] || set -- "$@" --key "$GOVERNORD_KEY_FILE"

    what="$event event for $namespace/$app${host:+ (host $host)} ($version, delivery $delivery)"
    attempt=1
    while :; do
        # signed afresh for each attempt: same delivery id, current timestamp
        timestamp=$(date +%s)
        if ! signature=$(governord_sign "$delivery" "$timestamp" "$tmp/body"); then
            governord_log "cannot sign the event: is openssl installed?"
            return 2
        fi
        : >"$tmp/response"
        code=$(curl "$@" --header "Governord-Timestamp: $timestamp" --header "Governord-Signature: $signature" \
            --url "$url" 2>"$tmp/curl.err")
        rc=$?
        retry=no
        if [ "$rc" -eq 0 ]; then
            case $code in
                2??)
                    answer=$(governord_answer "$tmp/response")
                    case $answer in
                        "reply "*) governord_log "governord answered the $what: HTTP $code: ${answer#reply }" ;;
                        *) governord_log "governord accepted the $what: HTTP $code" ;;
                    esac
                    return 0 ;;
                408 | 429 | 5??)
                    answer=$(governord_answer "$tmp/response")
                    problem="governord answered HTTP $code: ${answer#* }"
                    retry=yes ;;
                *)
                    # a webhook reply (a decline: 409, its reason and its request) or a refusal
                    answer=$(governord_answer "$tmp/response")
                    case $answer in
                        "reply "*) governord_log "governord answered the $what: HTTP $code: ${answer#reply }" ;;
                        *) governord_log "governord refused the $what: HTTP $code: ${answer#error }" ;;
                    esac
                    return 1 ;;
            esac
        else
            problem=$(tr '\n' ' ' <"$tmp/curl.err")
            problem="cannot reach governord at $url: ${problem:-curl exit $rc}"
            # connection, timeout and transport errors may pass; TLS verification, certificate
            # and URL errors will not
            case $rc in 5 | 6 | 7 | 16 | 18 | 28 | 35 | 52 | 55 | 56) retry=yes ;; esac
        fi
        if [ "$retry" = no ] || [ "$attempt" -ge "$attempts" ]; then
            governord_log "could not deliver the $what after $attempt attempt(s): $problem"
            return 1
        fi
        governord_log "attempt $attempt of $attempts: $problem; retrying in $delay s"
        sleep "$delay"
        attempt=$(( attempt + 1 ))
        delay=$(( delay * 2 > 30 ? 30 : delay * 2 ))
    done
)

# governord_hook EVENT [HOST]: governord_run, then apply the failure policy (drained: HOST is the
# governord host that drained; a failed delivery fails it, as the host would wait for its timeout). A failed delivery fails
# the deploy hook (the deployment asked for capacity and nobody heard) and the teardown hook
# (the component's hosts would stay), but not the post_deploy hook (its failure would fail or
# roll back a deployment that already runs); GOVERNORD_FAIL_OPEN=1 or 0 overrides any default.
governord_hook() {
    case $1 in
        deploy | teardown) _fail_open=0 ;;
        post_deploy) _fail_open=1 ;;
        drained)
            _fail_open=0
            case ${2:-} in
                '') governord_log "usage: drained HOST (the governord host that drained, as the draining callback named it)"
                    return 2 ;;
                -* | .* | *[!A-Za-z0-9.-]*) governord_log "not a host name: '$2'"; return 2 ;;
            esac ;;
        *) governord_log "unknown event '$1' (deploy, post_deploy, teardown or drained)"; return 2 ;;
    esac
    case ${GOVERNORD_FAIL_OPEN:-} in
        '') ;;
        1 | yes | true) _fail_open=1 ;;
        0 | no | false) _fail_open=0 ;;
        *) governord_log "GOVERNORD_FAIL_OPEN must be 1 or 0, got '$GOVERNORD_FAIL_OPEN'"; return 2 ;;
    esac
    governord_run "$1" "${2:-}"
    _status=$?
    if [ "$_status" -ne 0 ] && [ "$_fail_open" = 1 ]; then
        governord_log "continuing the deployment anyway (fail open: GOVERNORD_FAIL_OPEN=${GOVERNORD_FAIL_OPEN:-unset, the $1 default})"
        return 0
    fi
    return "$_status"
}

"""How the simulated server fails, in the shapes the real one puts on the wire.

Spacewalk's XML-RPC servlet (redstone) turns an exception into a fault in one of two ways:

* an ``XmlRpcFault`` (every handler exception is translated into one, see ``ExceptionTranslator``)
  keeps its error code and gets ``"redstone.xmlrpc.XmlRpcFault: "`` in front of its message;
* any other exception thrown *outside* the reflective handler call (the session lookup, the
  parameter translation) becomes fault code -1 with ``"<java class>: <message>"``.

:class:`ApiFault` is the first kind, :class:`JavaException` the second. A :class:`JavaException`
raised *inside* a handler is not what the client sees: the translator wraps it as
``ApiFault(-1, "unhandled internal exception: <message>")`` (see :func:`unhandled`).
"""

from __future__ import annotations

import xmlrpc.client

REDSTONE_FAULT = "redstone.xmlrpc.XmlRpcFault"

# Java classes whose names appear in fault strings.
LOOKUP_EXCEPTION = "com.redhat.rhn.common.hibernate.LookupException"
INVALID_SESSION_EXCEPTION = "com.redhat.rhn.domain.session.InvalidSessionIdException"
TRANSLATION_EXCEPTION = "com.redhat.rhn.common.translation.TranslationException"
DUPLICATE_OBJECT_EXCEPTION = "com.redhat.rhn.common.hibernate.DuplicateObjectException"
PERMISSION_EXCEPTION = "com.redhat.rhn.common.security.PermissionException"
ILLEGAL_ARGUMENT_EXCEPTION = "java.lang.IllegalArgumentException"

# Error codes (FAULT_CODES.tsv) the simulator raises.
UNHANDLED = -1
PERMISSION_CHECK_FAILURE = -23
NO_SUCH_CHANNEL = -210
NO_SUCH_ENTITLEMENT = -212
ACTIVATION_KEY_NOT_FOUND = -212
NO_SUCH_SYSTEM = -208
NO_SUCH_USER = -213
NO_SUCH_ROLE = -2005
SYSTEMS_NOT_DELETED = 1003
PROFILE_NAME_TOO_SHORT = 1060
PROFILE_NAME_TOO_LONG = 1061
ACTIVATION_KEY_EXISTS = 1090
SYSTEMS_EXIST = 1100
INVALID_PARAMETER = 1213
LOOKUP_SERVER_GROUP = 2201
INVALID_ARGS = 2801
LOGIN_FAILED = 2950


class ApiFault(Exception):
    """A fault the handler layer raises; on the wire: ``code``, ``redstone.xmlrpc.XmlRpcFault: msg``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_fault(self) -> xmlrpc.client.Fault:
        """The fault exactly as redstone writes it."""
        return xmlrpc.client.Fault(self.code, f"{REDSTONE_FAULT}: {self.message}")


class JavaException(Exception):
    """A non-fault Java exception; outside a handler it reaches the wire as code -1 with its class name."""

    def __init__(self, java_class: str, message: str) -> None:
        super().__init__(message)
        self.java_class = java_class
        self.message = message

    def to_fault(self) -> xmlrpc.client.Fault:
        """The fault redstone writes for an exception that is not an ``XmlRpcFault``."""
        return xmlrpc.client.Fault(UNHANDLED, f"{self.java_class}: {self.message}")


def unhandled(exc: JavaException) -> ApiFault:
    """What ``ExceptionTranslator`` makes of a non-fault exception thrown inside a handler."""
    return ApiFault(UNHANDLED, f"unhandled internal exception: {exc.message}")


def no_such_system(sid: object | None = None) -> ApiFault:
    """``NoSuchSystemException``: with the id when raised by ``XmlRpcSystemHelper.lookupServer``."""
    if sid is None:
        return ApiFault(NO_SUCH_SYSTEM, "No such system")
    return ApiFault(NO_SUCH_SYSTEM, f"No such system - sid = {sid}")


def permission_denied(role_name: str | None = None) -> ApiFault:
    """``PermissionCheckFailureException``: plain (also what a failed group lookup in setGroupMembership
    becomes), or naming the role ``BaseHandler.ensureUserRole`` found missing (by its name)."""
    if role_name is None:
        return ApiFault(PERMISSION_CHECK_FAILURE, "You do not have permissions to perform this action.")
    return ApiFault(
        PERMISSION_CHECK_FAILURE,
        "You do not have permissions to perform this action. "
        f"You need to have at least a {role_name} role to perform this action",
    )


def no_group_admin_role(login: str) -> JavaException:
    """``ServerGroupManager.validateAdminCredentials``: a plain ``PermissionException`` (so -1 with
    "unhandled internal exception" when thrown inside a handler). The real text prints the
    ``User`` object; the login stands for it here."""
    return JavaException(
        PERMISSION_EXCEPTION,
        f"The desired operation cannot be performed since the user[{login}] does not have the system group admin role",
    )


def server_group_lookup(identifier: object) -> JavaException:
    """``ServerGroupManager.lookup`` failing: a plain ``LookupException``."""
    return JavaException(LOOKUP_EXCEPTION, f"Unable to locate or access server group: {identifier}")


def activation_key_not_found(key: str) -> ApiFault:
    """What a key lookup by the handler gives, missing key or not: -212 naming the key.

    ``ActivationKeyHandler.lookupKey`` goes through ``XmlRpcActivationKeysHelper.lookupKey``, which
    turns the ``LookupException`` of ``ActivationKeyManager.validateCredentials`` ("Could not find
    activation key: <k>") into ``FaultException(-212, "ActivationKeyNotFound", ...)``; the plain
    ``LookupException`` never reaches the wire."""
    return ApiFault(ACTIVATION_KEY_NOT_FOUND, f"Activation Key [{key}] Not Found!")


def java_message_arg(value: object) -> str:
    """An argument as ``LocalizationService.getMessage`` (``java.text.MessageFormat``) prints it:
    numbers with grouping separators (``1001`` is ``1,001``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def lookup_server_group_fault(identifier: object) -> ApiFault:
    """``LookupServerGroupException`` (2201), what ``ServerGroupHandler.getDetails`` makes of a failed
    lookup; its text is ``api.systemgroup.lookupServerGroup`` (StringResource_en_US.xml), which
    quotes the name or id."""
    return ApiFault(
        LOOKUP_SERVER_GROUP, f'Unable to locate or access server group: "{java_message_arg(identifier)}"'
    )

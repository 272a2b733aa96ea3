"""Method dispatch the way Spacewalk's ``BaseHandler.invoke`` does it.

* ``namespace.method``: the last dotted segment is the method, beanified (``get_id`` → ``getId``);
  the rest names the handler.
* If the first parameter is a string matching the session-key pattern and the handler is not
  ``auth`` or a search handler, the session is looked up *before* the method is chosen and the key
  is replaced by the user (so a bad session wins over a wrong parameter count).
* Methods are chosen by name and parameter count; among several, an exact type match wins,
  otherwise the first is taken and the parameters are converted (``Translator``).
* Every call made with a session extends the session's lifetime.
"""

from __future__ import annotations

import datetime as dt
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .faults import TRANSLATION_EXCEPTION, UNHANDLED, ApiFault, JavaException, unhandled
from .model import FLAVORS, SESSION_KEY, Session, State, User

#: Java class of each parameter kind, as named in "Could not find method" faults.
JAVA_TYPES: dict[str, str] = {
    "user": "com.redhat.rhn.domain.user.legacy.UserImpl",
    "string": "java.lang.String",
    "int": "java.lang.Integer",
    "boolean": "java.lang.Boolean",
    "array": "java.util.List",
    "struct": "java.util.Map",
    "date": "java.util.Date",
}

#: Handler classes behind the namespaces, as named in "Could not find method" faults.
HANDLER_CLASSES: dict[str, str] = {
    "auth": "com.redhat.rhn.frontend.xmlrpc.auth.AuthHandler",
    "system": "com.redhat.rhn.frontend.xmlrpc.system.SystemHandler",
    "systemgroup": "com.redhat.rhn.frontend.xmlrpc.systemgroup.ServerGroupHandler",
    "activationkey": "com.redhat.rhn.frontend.xmlrpc.activationkey.ActivationKeyHandler",
    "user": "com.redhat.rhn.frontend.xmlrpc.user.UserHandler",
}

ApiFunc = Callable[..., Any]
F = TypeVar("F", bound=ApiFunc)


@dataclass(frozen=True)
class ApiMethod:
    """One Java method of a handler: its name, parameter kinds (``user`` first if any) and body."""

    namespace: str
    name: str
    params: tuple[str, ...]
    func: ApiFunc
    #: the server flavours that have the method (:data:`FLAVORS`)
    flavors: frozenset[str] = frozenset({"uyuni", "spacewalk"})


_METHODS: dict[tuple[str, str], list[ApiMethod]] = {}


def api(namespace: str, name: str, *params: str, only: str | None = None) -> Callable[[F], F]:
    """Register ``func(state, *args)`` as ``namespace.name`` with the given parameter kinds; ``only``
    names the one flavour that has it (else every flavour)."""

    def register(func: F) -> F:
        for kind in params:
            if kind not in JAVA_TYPES:
                raise ValueError(f"unknown parameter kind {kind!r}")
        if only is not None and only not in FLAVORS:
            raise ValueError(f"unknown flavour {only!r}")
        flavors = frozenset({only}) if only else frozenset(FLAVORS)
        _METHODS.setdefault((namespace, name), []).append(ApiMethod(namespace, name, params, func, flavors))
        return func

    return register


def beanify(name: str) -> str:
    """``StringUtil.beanify``: ``get_id`` → ``getId``."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def java_class(value: Any) -> str:
    """The Java class redstone gives a decoded XML-RPC value."""
    if isinstance(value, User):
        return JAVA_TYPES["user"]
    if isinstance(value, bool):
        return "java.lang.Boolean"
    if isinstance(value, int):
        return "java.lang.Integer"
    if isinstance(value, float):
        return "java.lang.Double"
    if isinstance(value, str):
        return "java.lang.String"
    if isinstance(value, (list, tuple)):
        return "redstone.xmlrpc.XmlRpcArray"
    if isinstance(value, dict):
        return "redstone.xmlrpc.XmlRpcStruct"
    if isinstance(value, (xmlrpc.client.DateTime, dt.datetime)):
        return "java.util.Date"
    if isinstance(value, (bytes, xmlrpc.client.Binary)):
        return "[B"
    return "java.lang.Object"


def _matches(kind: str, value: Any) -> bool:
    if kind == "user":
        return isinstance(value, User)
    if kind == "string":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, (list, tuple))
    if kind == "struct":
        return isinstance(value, dict)
    if kind == "date":
        return isinstance(value, (xmlrpc.client.DateTime, dt.datetime))
    return False


def _translate(kind: str, value: Any) -> Any:
    """``Translator.convert`` for the conversions the API actually relies on."""
    if kind == "string" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if kind == "int" and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise JavaException("java.lang.NumberFormatException", f'For input string: "{value}"') from None
    if kind == "boolean" and isinstance(value, int):
        return value == 1
    if kind == "boolean" and isinstance(value, str):
        return value.strip().lower() == "true"
    raise JavaException(
        TRANSLATION_EXCEPTION,
        f"Could not find translator for class {java_class(value)} to class {JAVA_TYPES[kind]}",
    )


def _no_method(namespace: str, bean: str, params: list[Any]) -> ApiFault:
    names = ", ".join(java_class(p) for p in params)
    handler = HANDLER_CLASSES.get(namespace, namespace)
    return ApiFault(UNHANDLED, f"Could not find method: {bean} in class: {handler} with params: [{names}]")


def dispatch(state: State, method: str, params: tuple[Any, ...]) -> Any:
    """Run one XML-RPC call; returns the result or raises ``xmlrpc.client.Fault``."""
    namespace, _, raw_name = method.rpartition(".")
    if namespace not in HANDLER_CLASSES:
        # redstone itself answers when no handler is registered under the name.
        raise xmlrpc.client.Fault(UNHANDLED, "The specified handler cannot be found")
    bean = beanify(raw_name)
    args = list(params)
    session: Session | None = None
    try:
        if (
            args
            and isinstance(args[0], str)
            and SESSION_KEY.match(args[0])
            and namespace != "auth"
            and not namespace.endswith("search")
        ):
            session = state.lookup_session(args[0])
            user = state.users.get(session.login)
            if user is None:
                raise JavaException(
                    "com.redhat.rhn.common.hibernate.LookupException",
                    f"Could not find a valid user for session with key: {args[0]}",
                )
            args[0] = user
        candidates = [
            m for m in _METHODS.get((namespace, bean), []) if len(m.params) == len(args) and state.flavor in m.flavors
        ]
        if not candidates:
            raise _no_method(namespace, bean, args)
        chosen = next(
            (m for m in candidates if all(_matches(k, v) for k, v in zip(m.params, args, strict=False))), None
        )
        if chosen is None:
            chosen = candidates[0]
            args = [v if _matches(k, v) else _translate(k, v) for k, v in zip(chosen.params, args, strict=False)]
    except ApiFault as fault:
        raise fault.to_fault() from None
    except JavaException as exc:
        raise exc.to_fault() from None

    try:
        with state.lock:
            return chosen.func(state, *args)
    except ApiFault as fault:
        raise fault.to_fault() from None
    except JavaException as exc:
        raise unhandled(exc).to_fault() from None
    finally:
        if session is not None:
            state.extend_session(session)

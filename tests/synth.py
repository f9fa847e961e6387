"""Synthetic FreeSWITCH channel events, for situations no capture covers.

Each helper returns the headers FreeSWITCH 1.10 puts on that event, as far as
the tracker reads them (names and shapes copied from the real captures in
tests/fixtures/callcentre). Tests that use these say so.
"""

import itertools

_ids = itertools.count(1)


def new_uuid(prefix="leg"):
    return f"{prefix}-{next(_ids):04d}-0000-0000-000000000000"


class Leg:
    """One channel; methods return the events it emits."""

    def __init__(self, direction, context, cid, dest, name, parent=None, variables=None):
        self.uuid = new_uuid()
        self.base = {
            "Unique-ID": self.uuid, "Call-Direction": direction, "Caller-Context": context,
            "Caller-Caller-ID-Number": cid, "Caller-Orig-Caller-ID-Number": cid,
            "Caller-Destination-Number": dest, "Channel-Name": name,
        }
        if parent is not None:
            self.base["Other-Leg-Unique-ID"] = parent.uuid
            self.base["variable_originating_leg_uuid"] = parent.uuid
        self.base.update(variables or {})

    def event(self, name, **extra):
        return {"Event-Name": name, **self.base, **extra}

    def create(self, **extra):
        return self.event("CHANNEL_CREATE", **extra)

    def execute(self, app, data="", **extra):
        return self.event("CHANNEL_EXECUTE", Application=app, **{"Application-Data": data}, **extra)

    def answer(self, **extra):
        return self.event("CHANNEL_ANSWER", **extra)

    def bridge(self, other, **extra):
        return self.event("CHANNEL_BRIDGE", **{"Other-Leg-Unique-ID": other.uuid}, **extra)

    def hangup(self, cause, disposition="", **extra):
        headers = {"Hangup-Cause": cause}
        if disposition:
            headers["variable_sip_hangup_disposition"] = disposition
        headers.update(extra)
        return self.event("CHANNEL_HANGUP_COMPLETE", **headers)

    def set(self, **variables):
        """Later events carry these channel variables (dialplan ``set``)."""
        self.base.update({f"variable_{k}": v for k, v in variables.items()})


def caller(did="492214710334", cid="493023125741"):
    """A call from the carrier into context public."""
    return Leg("inbound", "public", cid, did, f"sofia/external/{cid}@carrier.invalid")


def agent_leg(parent, ext="1001", context="public", **variables):
    """FreeSWITCH ringing an agent's phone for ``parent``."""
    return Leg("outbound", context, parent.base["Caller-Caller-ID-Number"], ext,
               f"sofia/internal/{ext}@127.0.0.1:5090", parent=parent, variables=variables)


def agent_call(ext="1001", dest="4989123456789"):
    """An agent dialling from their phone (context default)."""
    return Leg("inbound", "default", ext, dest, f"sofia/internal/{ext}@127.0.0.1",
               variables={"variable_user_name": ext, "variable_sip_authorized": "true"})


def carrier_leg(parent, dest="4989123456789"):
    """FreeSWITCH dialling out through gateway ``carrier``."""
    return Leg("outbound", parent.base["Caller-Context"], "492214710334", dest,
               f"sofia/external/{dest}", parent=parent,
               variables={"variable_sip_gateway_name": "carrier"})


def picked_up_call():
    """1001's phone rings; 1002 picks the call up with intercept (``*8``), talks, caller hangs up.

    Returns (caller leg, events). After pickup FreeSWITCH shows the picking
    agent's number as the caller on the A-leg: the Zammad call must not.
    """
    a = caller()
    ringing = agent_leg(a, "1001")
    picker = agent_call("1002", dest="**1001")
    events = [a.create(), a.execute("bridge"), ringing.create(), picker.create(),
              picker.execute("intercept", a.uuid), ringing.hangup("PICKED_OFF", "send_cancel"),
              a.answer(), a.bridge(picker)]
    a.base["Caller-Caller-ID-Number"] = "1002"
    events += [a.hangup("NORMAL_CLEARING", "recv_bye"), picker.hangup("NORMAL_CLEARING")]
    return a, events

"""Reference strategies behind one ``Reference`` protocol (this branch adds only ``Remote``)."""

from .remote import Remote, choose_placement

__all__ = ["Remote", "choose_placement"]

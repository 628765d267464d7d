"""Tells twistd about the ``mailplat`` application; all the work lives in ``mailplat.tap``."""

from twisted.application.service import ServiceMaker

mailplat = ServiceMaker(
    "mailplat",
    "mailplat.tap",
    "A mail server: ESMTP, submission, LMTP and ODMR listeners over one durable queue.",
    "mailplat",
)

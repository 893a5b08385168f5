"""The mail floor of libs/common: what two or more services know about mail.

Composition (``render`` builds a campaign's message once and personalises it per recipient;
``mergetags`` parses and fills templates; ``links`` and ``tracking`` find and sign the links
and the open pixel; ``base64body`` encodes the body parts), the signed tokens of links
(``tokens``, ``unsubscribe``), the return path (``verp``), reading SMTP replies and bounces
(``smtp_reply``, ``bounce_class``), what an address is (``addresses``), the can-send rule
(``can_send``) and its vocabulary (``states``), and a campaign's content by reference
(``content``).

It builds on the runtime floor (``libs/common``: settings, logging, errors, Kafka, the
database, HTTP); the runtime floor never imports from here.
"""

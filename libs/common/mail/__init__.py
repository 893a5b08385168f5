"""The mail floor of libs/common: what two or more services know about mail.

Composition, one linear pipeline (:mod:`~libs.common.mail.compose`)::

    template = CampaignTemplate(...)             # once a campaign: template.py
    data = compose(template, recipient, signers)  # per recipient: compose.py

``template`` parses the subject and body (``mergetags``), derives the text part of an HTML
body (``textpart``), cuts each part at its links and open pixel (``links``), prepares the
base64 of the constant text (``base64body``) and folds the static head (``mime``).
``compose`` runs the per-recipient stages in order: unsubscribe headers (``unsubscribe``) →
merge values → header lines (``mime``) → tracking (``tracking``) → fill → encode → assemble.
``render.CampaignMessage`` is a template that renders itself from given values.

Beside composition: the signed and sealed tokens of links (``tokens``), the return path
(``verp``), reading SMTP replies and bounces (``smtp_reply``, ``bounce_class``), what an
address is (``addresses``), the can-send rule (``can_send``) and its vocabulary, the
membership states and delivery statuses (``states``), and a campaign's content by reference
(``content``).

It builds on the runtime floor (``libs/common``: settings, logging, errors, Kafka, the
database, HTTP); the runtime floor never imports from here.
"""

"""One module per screen, its templates beside it; each has ``routes``."""

from services.console.screens import (
    campaign,
    contact,
    contacts,
    groups,
    home,
    imports,
    jobs,
    login,
    soon,
)

SCREENS = (login, home, contacts, contact, groups, imports, jobs, campaign, soon)

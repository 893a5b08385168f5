"""The deliverability service: per receiving domain, windowed counts of what the sending
and feedback streams say (faust-streaming agents and tables); ``GET /v1/domains``; per
campaign, its complaint guard (``campaign.guard``, ``GET /v1/campaigns/{id}``)."""

-- The housekeeping sweep of SendGrid sends in doubt (actors/housekeeping/email_outcomes.py)
-- reads the e-mails not sent yet and the ledger rows not settled: a few rows each,
-- however long email_log and email_provider_sends grow.
CREATE INDEX email_log_unsent_idx ON email_log (idempotency_key)
    WHERE status IN ('pending', 'sending');
CREATE INDEX email_provider_sends_unsettled_idx ON email_provider_sends (last_sent_at)
    WHERE state IN ('sending', 'not_sent');

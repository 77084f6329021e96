"""`mailer ops …`: what the on-call engineer runs (R27); docs/ONCALL_PLAYBOOK.md says when."""

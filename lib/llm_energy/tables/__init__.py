"""The study's tables (plumbing layer): the one writer and the table definitions (:mod:`.store`), and the
rows the phases write, built in one place (:mod:`.rows`)."""

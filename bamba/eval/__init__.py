"""Evaluations: PhoneBook retrieval over context lengths (``phonebook``), perplexity overall and
by position along long documents (``perplexity``), lm-evaluation-harness tasks (``harness``, with
the span scoring it uses in ``span_scores``), and the plots (``plots``, matplotlib imported only
when a plot is drawn). ``bamba eval`` runs them from the command line."""

"""Thin Faust agents: decode records into envelopes, batch them, hand them to ``app``, ack."""

"""Special token ids, defined once: the tokenizer reserves them, everything else imports them."""
PAD_ID = 0          # padding; masks treat it as "not a token"
UNK_ID = 1
BOS_ID = 2          # first decoder input
EOS_ID = 3          # end of every source and target
FIRST_WORD_ID = 4   # ids from here on are ordinary pieces

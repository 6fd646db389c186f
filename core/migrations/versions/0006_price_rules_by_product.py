"""Price rules invalidate by product id: the capture trigger resolves a rule's scope to products.

Until now a price-rule change emitted one ``price_rule.changed`` per distinct (scope, target),
and the consumer voided the ``category:<c>`` / ``brand:<b>`` tag sets for the broad scopes. The
Redis Cluster format (docs/design/cache-v3-cluster.md, "Open question", option 2) has no such
sets: it can only delete product keys it can derive from ids. So the trigger now resolves each
distinct (scope, target) of the statement's old and new rows into the ids of the products it
covers, in one set-based query, and writes ``price_rule.changed`` entries of at most 100
``product_ids`` (as ``products.updated`` chunks a bulk UPDATE), each still naming its scope
(``product_id``, ``category_id`` or ``brand_id``) for information:

* product scope: ``product_ids`` is that one id (whether or not such a product exists);
* category / brand scope: the ids of the products currently in it, 100 per entry; a scope with
  no products writes nothing (no cached product can carry its price).

A fence keeps a product that enters the scope concurrently from being missed. The trigger locks
the scopes' ``categories`` / ``brands`` rows ``FOR UPDATE`` before it reads ``products``; a
product INSERT, or an UPDATE that changes ``category_id`` / ``brand_id``, takes ``FOR KEY SHARE``
on the row it points to (the foreign key's own check), which conflicts. Either the product write
committed first (the trigger waited for it, and its next statement's snapshot sees the product),
or it waits until the rule's transaction commits (every read of the product after its commit
also sees the new rule). Without the fence, a reader between the two commits could cache the
product at the old price and no event would name it. The fence holds for writers of
``price_rules`` in READ COMMITTED (the default); a REPEATABLE READ transaction keeps the snapshot
of its first statement.

The downgrade restores 0005's function (one entry per scope, no ids).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Constant SQL. 100 ids per entry: events.MAX_PRODUCT_IDS bounds what the consumer accepts.
BY_PRODUCT = """
CREATE OR REPLACE FUNCTION catalog_capture_price_rules() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  scopes text[];
  targets text[];
BEGIN
  IF NOT catalog_capture_on() THEN RETURN NULL; END IF;
  IF TG_OP = 'INSERT' THEN
    SELECT array_agg(scope), array_agg(target_id) INTO scopes, targets
    FROM (SELECT DISTINCT scope, target_id FROM new_rows) AS s;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT array_agg(scope), array_agg(target_id) INTO scopes, targets
    FROM (SELECT DISTINCT scope, target_id FROM old_rows) AS s;
  ELSE
    SELECT array_agg(scope), array_agg(target_id) INTO scopes, targets
    FROM (SELECT scope, target_id FROM new_rows UNION SELECT scope, target_id FROM old_rows) AS s;
  END IF;
  IF scopes IS NULL THEN RETURN NULL; END IF;
  -- The fence (see the migration's docstring): conflicts with the FOR KEY SHARE that a product
  -- entering one of these scopes takes; in id order, so two rule statements cannot deadlock.
  PERFORM 1 FROM categories
  WHERE id IN (SELECT t FROM unnest(scopes, targets) AS u(s, t) WHERE s = 'category')
  ORDER BY id FOR UPDATE;
  PERFORM 1 FROM brands
  WHERE id IN (SELECT t FROM unnest(scopes, targets) AS u(s, t) WHERE s = 'brand')
  ORDER BY id FOR UPDATE;
  -- A new statement, so a new snapshot: it sees every product write the fence waited for.
  -- Per scope, one indexed read of its product ids into an array, numbered by WITH ORDINALITY
  -- and cut into entries of 100 by a hash aggregate: no sort, no window, no loop.
  INSERT INTO outbox (fields)
  SELECT catalog_event('price_rule.changed',
                       jsonb_build_object(u.s || '_id', u.t, 'product_ids', chunks.ids))
  FROM unnest(scopes, targets) AS u(s, t)
  CROSS JOIN LATERAL (
    SELECT string_agg(id, ',') AS ids
    FROM unnest(CASE u.s
                  WHEN 'product' THEN ARRAY[u.t]
                  WHEN 'category' THEN ARRAY(SELECT id FROM products WHERE category_id = u.t)
                  WHEN 'brand' THEN ARRAY(SELECT id FROM products WHERE brand_id = u.t)
                END) WITH ORDINALITY AS covered(id, n)
    GROUP BY (n - 1) / 100
  ) AS chunks;
  RETURN NULL;
END $$;
"""

# 0005's function, as it was.
BY_SCOPE = """
CREATE OR REPLACE FUNCTION catalog_capture_price_rules() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NOT catalog_capture_on() THEN RETURN NULL; END IF;
  IF TG_OP = 'INSERT' THEN
    INSERT INTO outbox (fields)
    SELECT catalog_event('price_rule.changed', jsonb_build_object(scope || '_id', target_id))
    FROM (SELECT DISTINCT scope, target_id FROM new_rows) AS scopes ORDER BY scope, target_id;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO outbox (fields)
    SELECT catalog_event('price_rule.changed', jsonb_build_object(scope || '_id', target_id))
    FROM (SELECT DISTINCT scope, target_id FROM old_rows) AS scopes ORDER BY scope, target_id;
  ELSE
    INSERT INTO outbox (fields)
    SELECT catalog_event('price_rule.changed', jsonb_build_object(scope || '_id', target_id))
    FROM (SELECT scope, target_id FROM new_rows UNION SELECT scope, target_id FROM old_rows)
      AS scopes
    ORDER BY scope, target_id;
  END IF;
  RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.execute(BY_PRODUCT)


def downgrade() -> None:
    op.execute(BY_SCOPE)

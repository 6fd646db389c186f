"""Change capture: triggers write the invalidation of every committed change into the outbox.

Every table a cached product or page is built from has statement-level AFTER triggers with
transition tables (one trigger per operation: PostgreSQL allows transition tables only on
single-event triggers). Each statement writes its events with set-based INSERTs into ``outbox``
in the changing transaction, so no writer (the service, psql, a bulk import, an admin tool) can
forget, and a rollback publishes nothing. What each change emits (docs/events.md):

* ``products`` INSERT / DELETE: ``product.created`` / ``product.deleted`` per row.
* ``products`` UPDATE: a one-row statement, and any row whose category or brand changed, gets its
  own ``product.updated`` (previous category/brand when it moved; the new ``version`` when it
  increased, so a write-through's entry at that version is kept). The other rows of a bulk
  statement go as ``products.updated`` entries of at most 100 ids: an UPDATE of 100k rows writes
  1,000 outbox rows, not 100k. A changed id counts as a delete and a create.
* ``categories`` / ``brands`` UPDATE: ``category.updated`` / ``brand.updated`` per id whose name
  changed. Inserting or deleting one changes no cached value (a product needs its category and
  brand to exist, so none refers to a new or deleted one).
* ``product_images`` (any operation): the products concerned, like a bulk products UPDATE.
* ``price_rules`` (any operation): ``price_rule.changed`` per distinct (scope, target) of the old
  and the new rows.

A statement-level trigger on ``outbox`` itself calls ``pg_notify('catalog_outbox', '')`` when rows
were inserted (by these triggers or by an explicit writer); PostgreSQL delivers it at COMMIT and
folds repeats within one transaction into one, and the relay waits on it instead of polling.

A session that loads a catalog no cache has seen (``catalog seed``) may ``SET LOCAL
catalog.capture = 'off'``. TRUNCATE is not captured (it names no rows): after a reset, use a new
key namespace or flush the old one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Constant SQL. 100 ids per products.updated entry: events.MAX_PRODUCT_IDS bounds what the
# consumer accepts.
FUNCTIONS = """
CREATE FUNCTION catalog_capture_on() RETURNS boolean LANGUAGE sql STABLE AS $$
  SELECT coalesce(current_setting('catalog.capture', true), '') <> 'off'
$$;

-- The fields of one event (schema 1): a fresh event id, the current time, the given ids (null
-- ones left out), and the writer's W3C trace context when its transaction set
-- catalog.traceparent (55 characters, else left out; the consumer checks its format).
CREATE FUNCTION catalog_event(kind text, ids jsonb) RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT jsonb_build_object(
    'schema', '1',
    'type', kind,
    'event_id', replace(gen_random_uuid()::text, '-', ''),
    'occurred_at', floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint::text
  ) || jsonb_strip_nulls(ids) || jsonb_strip_nulls(jsonb_build_object('traceparent', (
    SELECT tp FROM (SELECT current_setting('catalog.traceparent', true) AS tp) s
    WHERE length(tp) = 55)))
$$;

-- Products whose cached entry changed in place: product.updated for one, products.updated
-- chunks of 100 ids for more. No version: the consumer deletes their entries outright.
CREATE FUNCTION catalog_products_changed(ids text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF cardinality(ids) = 1 THEN
    INSERT INTO outbox (fields)
    VALUES (catalog_event('product.updated', jsonb_build_object('product_id', ids[1])));
  ELSIF cardinality(ids) > 1 THEN
    INSERT INTO outbox (fields)
    SELECT catalog_event('products.updated',
                         jsonb_build_object('product_ids', string_agg(id, ',' ORDER BY id)))
    FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1) / 100 AS chunk
          FROM unnest(ids) AS id) AS numbered
    GROUP BY chunk
    ORDER BY chunk;
  END IF;
END $$;

CREATE FUNCTION catalog_capture_products() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  total bigint;
BEGIN
  IF NOT catalog_capture_on() THEN RETURN NULL; END IF;
  IF TG_OP = 'INSERT' THEN
    INSERT INTO outbox (fields)
    SELECT catalog_event('product.created', jsonb_build_object(
      'product_id', id, 'category_id', category_id, 'brand_id', brand_id,
      'version', version::text))
    FROM new_rows ORDER BY id;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO outbox (fields)
    SELECT catalog_event('product.deleted', jsonb_build_object(
      'product_id', id, 'category_id', category_id, 'brand_id', brand_id))
    FROM old_rows ORDER BY id;
  ELSE
    SELECT count(*) INTO total FROM new_rows;
    -- One join of the two transition tables feeds every kind of entry, in this order: a
    -- changed id (the old product deleted, a new one created); a one-row statement or a row
    -- that moved (its own product.updated, with what list pages and versions need); the other
    -- rows of a bulk statement, 100 ids per products.updated.
    INSERT INTO outbox (fields)
    WITH pairs AS MATERIALIZED (
      SELECT n.id, o.id AS old_id, n.category_id, n.brand_id, n.version,
             o.category_id AS old_category, o.brand_id AS old_brand, o.version AS old_version
      FROM new_rows n FULL JOIN old_rows o ON o.id = n.id
    ),
    events AS (
      SELECT 1 AS kind, old_id AS first_id, catalog_event('product.deleted', jsonb_build_object(
        'product_id', old_id, 'category_id', old_category, 'brand_id', old_brand)) AS fields
      FROM pairs WHERE id IS NULL
      UNION ALL
      SELECT 2, id, catalog_event('product.created', jsonb_build_object(
        'product_id', id, 'category_id', category_id, 'brand_id', brand_id))
      FROM pairs WHERE old_id IS NULL
      UNION ALL
      SELECT 3, id, catalog_event('product.updated', jsonb_build_object(
        'product_id', id, 'category_id', category_id, 'brand_id', brand_id,
        'previous_category_id', CASE WHEN old_category <> category_id THEN old_category END,
        'previous_brand_id', CASE WHEN old_brand <> brand_id THEN old_brand END,
        'version', CASE WHEN version > old_version THEN version::text END))
      FROM pairs
      WHERE id = old_id
        AND (total = 1 OR old_category <> category_id OR old_brand <> brand_id)
      UNION ALL
      SELECT 4, min(id), catalog_event('products.updated',
                                       jsonb_build_object('product_ids',
                                                          string_agg(id, ',' ORDER BY id)))
      FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1) / 100 AS chunk
            FROM pairs
            WHERE total > 1 AND id = old_id
              AND old_category = category_id AND old_brand = brand_id) AS unmoved
      GROUP BY chunk
    )
    SELECT fields FROM events ORDER BY kind, first_id;
  END IF;
  RETURN NULL;
END $$;

-- categories and brands (TG_ARGV[0] = 'category' or 'brand'): ids whose name changed.
CREATE FUNCTION catalog_capture_names() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NOT catalog_capture_on() THEN RETURN NULL; END IF;
  INSERT INTO outbox (fields)
  SELECT catalog_event(TG_ARGV[0] || '.updated', jsonb_build_object(TG_ARGV[0] || '_id', id))
  FROM (SELECT coalesce(n.id, o.id) AS id
        FROM new_rows n FULL JOIN old_rows o ON o.id = n.id
        WHERE n.name IS DISTINCT FROM o.name) AS renamed
  ORDER BY id;
  RETURN NULL;
END $$;

CREATE FUNCTION catalog_capture_images() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  ids text[];
BEGIN
  IF NOT catalog_capture_on() THEN RETURN NULL; END IF;
  IF TG_OP = 'INSERT' THEN
    SELECT array_agg(DISTINCT product_id) INTO ids FROM new_rows;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT array_agg(DISTINCT product_id) INTO ids FROM old_rows;
  ELSE
    SELECT array_agg(product_id) INTO ids
    FROM (SELECT product_id FROM new_rows UNION SELECT product_id FROM old_rows) AS both_sides;
  END IF;
  -- Images deleted with their product (ON DELETE CASCADE): product.deleted covers those.
  SELECT array_agg(p.id) INTO ids FROM products p WHERE p.id = ANY (ids);
  PERFORM catalog_products_changed(ids);
  RETURN NULL;
END $$;

CREATE FUNCTION catalog_capture_price_rules() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE FUNCTION catalog_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM new_rows) THEN
    PERFORM pg_notify('catalog_outbox', '');
  END IF;
  RETURN NULL;
END $$;
"""

# One trigger per table and operation: PostgreSQL allows transition tables only on single-event
# triggers.
TRIGGERS = """
CREATE TRIGGER products_capture_insert AFTER INSERT ON products
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_products();
CREATE TRIGGER products_capture_update AFTER UPDATE ON products
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_products();
CREATE TRIGGER products_capture_delete AFTER DELETE ON products
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_products();
CREATE TRIGGER categories_capture_update AFTER UPDATE ON categories
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_names('category');
CREATE TRIGGER brands_capture_update AFTER UPDATE ON brands
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_names('brand');
CREATE TRIGGER product_images_capture_insert AFTER INSERT ON product_images
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_images();
CREATE TRIGGER product_images_capture_update AFTER UPDATE ON product_images
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_images();
CREATE TRIGGER product_images_capture_delete AFTER DELETE ON product_images
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_images();
CREATE TRIGGER price_rules_capture_insert AFTER INSERT ON price_rules
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_price_rules();
CREATE TRIGGER price_rules_capture_update AFTER UPDATE ON price_rules
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_price_rules();
CREATE TRIGGER price_rules_capture_delete AFTER DELETE ON price_rules
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_capture_price_rules();
CREATE TRIGGER outbox_capture_insert AFTER INSERT ON outbox
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION catalog_outbox_notify();
"""

DROP = """
DROP TRIGGER products_capture_insert ON products;
DROP TRIGGER products_capture_update ON products;
DROP TRIGGER products_capture_delete ON products;
DROP TRIGGER categories_capture_update ON categories;
DROP TRIGGER brands_capture_update ON brands;
DROP TRIGGER product_images_capture_insert ON product_images;
DROP TRIGGER product_images_capture_update ON product_images;
DROP TRIGGER product_images_capture_delete ON product_images;
DROP TRIGGER price_rules_capture_insert ON price_rules;
DROP TRIGGER price_rules_capture_update ON price_rules;
DROP TRIGGER price_rules_capture_delete ON price_rules;
DROP TRIGGER outbox_capture_insert ON outbox;
DROP FUNCTION catalog_outbox_notify();
DROP FUNCTION catalog_capture_price_rules();
DROP FUNCTION catalog_capture_images();
DROP FUNCTION catalog_capture_names();
DROP FUNCTION catalog_capture_products();
DROP FUNCTION catalog_products_changed(text[]);
DROP FUNCTION catalog_event(text, jsonb);
DROP FUNCTION catalog_capture_on();
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)
    op.execute(TRIGGERS)


def downgrade() -> None:
    op.execute(DROP)

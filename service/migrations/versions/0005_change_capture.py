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

-- The fields of one event (schema 1): a fresh event id, the current time, and the given ids
-- (null ones left out).
CREATE FUNCTION catalog_event(kind text, ids jsonb) RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT jsonb_build_object(
    'schema', '1',
    'type', kind,
    'event_id', replace(gen_random_uuid()::text, '-', ''),
    'occurred_at', floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint::text
  ) || jsonb_strip_nulls(ids)
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
  unmoved text[];
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
    -- A changed id: the old product is gone, a new one exists.
    INSERT INTO outbox (fields)
    SELECT catalog_event('product.deleted', jsonb_build_object(
      'product_id', o.id, 'category_id', o.category_id, 'brand_id', o.brand_id))
    FROM old_rows o WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE n.id = o.id)
    ORDER BY o.id;
    INSERT INTO outbox (fields)
    SELECT catalog_event('product.created', jsonb_build_object(
      'product_id', n.id, 'category_id', n.category_id, 'brand_id', n.brand_id))
    FROM new_rows n WHERE NOT EXISTS (SELECT 1 FROM old_rows o WHERE o.id = n.id)
    ORDER BY n.id;
    -- One row, or a row that moved: its own event, with what list pages and versions need.
    INSERT INTO outbox (fields)
    SELECT catalog_event('product.updated', jsonb_build_object(
      'product_id', n.id, 'category_id', n.category_id, 'brand_id', n.brand_id,
      'previous_category_id',
        CASE WHEN o.category_id <> n.category_id THEN o.category_id END,
      'previous_brand_id', CASE WHEN o.brand_id <> n.brand_id THEN o.brand_id END,
      'version', CASE WHEN n.version > o.version THEN n.version::text END))
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE total = 1 OR o.category_id <> n.category_id OR o.brand_id <> n.brand_id
    ORDER BY n.id;
    IF total > 1 THEN
      SELECT array_agg(n.id) INTO unmoved
      FROM new_rows n JOIN old_rows o ON o.id = n.id
      WHERE o.category_id = n.category_id AND o.brand_id = n.brand_id;
      PERFORM catalog_products_changed(unmoved);
    END IF;
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

// Types the generated dashboards are checked against: @grafana/schema's own Dashboard and panel
// plugin types, read the way Grafana reads a saved dashboard (plain JSON, no TS enums).
import type { Dashboard, DataQuery, VariableModel } from '@grafana/schema';
import type * as BarGauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen.js';
import type * as Heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen.js';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen.js';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen.js';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.js';

type IsAny<T> = 0 extends 1 & T ? true : false;

/**
 * T as it appears in JSON: a string enum becomes the union of its values (`ThresholdsMode` ->
 * "absolute" | "percentage"), so a raw JSON literal can be checked with `satisfies` without casts.
 * Everything else keeps its shape, optionality and excess-property checks; numeric enums already
 * accept their numeric values.
 */
export type Json<T> =
  IsAny<T> extends true
    ? T
    : T extends string
      ? `${T}`
      : T extends number | boolean | null | undefined
        ? T
        : T extends ReadonlyArray<infer U>
          ? Array<Json<U>>
          : T extends object
            ? { [K in keyof T]: Json<T[K]> }
            : T;

/**
 * The Prometheus query model of Grafana 11.6, copied from @grafana/prometheus 11.6.0
 * (`Prometheus` in its dataquery.gen.ts) because that package drags in React and @grafana/ui.
 * Left out: `scopes`, `adhocFilters`, `groupByKeys` (need @grafana/data; never generated).
 */
export interface PrometheusQuery extends DataQuery {
  editorMode?: 'builder' | 'code';
  exemplar?: boolean;
  expr: string;
  format?: 'time_series' | 'table' | 'heatmap';
  instant?: boolean;
  intervalFactor?: number;
  legendFormat?: string;
  range?: boolean;
  interval?: string;
}

/**
 * grafana-foundation-sdk 11.6 writes `auto`, `auto_min` and `auto_count` on every variable (the
 * interval-variable settings Grafana reads at run time); @grafana/schema 11.6's VariableModel does
 * not declare them. Allowed here, typed, on variables only; every other unknown key still fails.
 */
export interface SdkVariable extends VariableModel {
  auto?: boolean;
  auto_min?: string;
  auto_count?: number;
}

type Panels = NonNullable<Dashboard['panels']>[number];
type WithPrometheusTargets<P> = P extends { targets?: unknown }
  ? Omit<P, 'targets'> & { targets?: PrometheusQuery[] }
  : P;

export type CheckedDashboard = Json<
  Omit<Dashboard, 'templating' | 'panels'> & {
    templating?: { list?: SdkVariable[] };
    panels?: Array<WithPrometheusTargets<Panels>>;
  }
>;

/** Per panel plugin: its `options` and `fieldConfig.defaults.custom` (`{}` = plugin has none). */
export interface PanelTypes {
  bargauge: { options: Json<BarGauge.Options>; custom: Record<string, never> };
  heatmap: { options: Json<Heatmap.Options>; custom: Json<Heatmap.FieldConfig> };
  stat: { options: Json<Stat.Options>; custom: Record<string, never> };
  table: { options: Json<Table.Options>; custom: Json<Table.FieldConfig> };
  timeseries: { options: Json<TimeSeries.Options>; custom: Json<TimeSeries.FieldConfig> };
}

// Type-checks every generated dashboard JSON against @grafana/schema with `tsc --noEmit`.
//
//   node check.mjs [DASHBOARD_DIR]      (default: ../../dashboards)
//
// For each dashboard it writes a .ts module holding the JSON as a literal and checks it with
// `satisfies CheckedDashboard` (no casts; excess keys fail), plus each panel's `options` and
// `fieldConfig.defaults.custom` against that panel plugin's own types. See types.ts.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const dashboardDir = path.resolve(process.argv[2] ?? path.join(here, '..', '..', 'dashboards'));
const tsc = path.join(here, 'node_modules', 'typescript', 'bin', 'tsc');
if (!fs.existsSync(tsc)) {
  console.error(`missing ${tsc}: run scripts/setup-grafana-schema.sh first`);
  process.exit(2);
}
const files = fs.readdirSync(dashboardDir).filter((f) => f.endsWith('.json')).sort();
if (files.length === 0) {
  console.error(`no dashboards in ${dashboardDir}`);
  process.exit(2);
}

const literal = (value) => JSON.stringify(value, null, 2);
const panelChecks = (dashboard) => {
  const lines = [];
  for (const [index, panel] of (dashboard.panels ?? []).entries()) {
    if (panel.type === 'row') continue;
    const where = `panel ${index} (${panel.type} "${panel.title}")`;
    lines.push(`// ${where.replaceAll('\n', ' ')}`);
    lines.push(`type P${index} = PanelTypes[${literal(panel.type)}];`);
    if (panel.options !== undefined) {
      lines.push(`export const options${index} = ${literal(panel.options)} satisfies P${index}['options'];`);
    }
    const custom = panel.fieldConfig?.defaults?.custom;
    if (custom !== undefined) {
      lines.push(`export const custom${index} = ${literal(custom)} satisfies P${index}['custom'];`);
    }
  }
  return lines.join('\n');
};

// Inside this directory so that tsc finds node_modules; removed afterwards.
const work = fs.mkdtempSync(path.join(here, '.check-'));
try {
  const inputs = files.map((file) => {
    const dashboard = JSON.parse(fs.readFileSync(path.join(dashboardDir, file), 'utf8'));
    const name = file.replace(/\.json$/, '.ts');
    const source = [
      `// ${file}`,
      `import type { CheckedDashboard, PanelTypes } from '../types';`,
      `export const dashboard = ${literal(dashboard)} satisfies CheckedDashboard;`,
      panelChecks(dashboard),
      '',
    ].join('\n');
    fs.writeFileSync(path.join(work, name), source);
    return name;
  });
  fs.writeFileSync(
    path.join(work, 'tsconfig.json'),
    literal({ extends: '../tsconfig.json', files: inputs }),
  );
  const result = spawnSync(process.execPath, [tsc, '-p', path.join(work, 'tsconfig.json'), '--pretty', 'false'], {
    encoding: 'utf8',
  });
  const output = (result.stdout + result.stderr).replaceAll(work + path.sep, '').trim();
  if (result.status !== 0) {
    console.error(output || `tsc exited with ${result.status}`);
    process.exitCode = 1; // not process.exit(): the finally below must remove the work dir
  } else {
    console.log(`@grafana/schema check passed: ${files.join(', ')}`);
  }
} finally {
  if (!process.env.KEEP_CHECK_DIR) fs.rmSync(work, { recursive: true, force: true });
}

// A small line / bar chart drawn on a canvas by hand (no library): series of numbers over an x axis.
const COLORS = ['#0b63ce', '#d92d20', '#079455', '#dc6803', '#7a5af8', '#0e9384', '#c11574', '#475467'];

export function color(i) { return COLORS[i % COLORS.length]; }

function setup(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 220;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = '11px system-ui, sans-serif';
  return { ctx, width, height };
}

function axes(ctx, width, height, min, max, pad) {
  ctx.strokeStyle = '#d9dde3';
  ctx.fillStyle = '#6b7280';
  for (let i = 0; i <= 4; i += 1) {
    const y = pad.top + ((height - pad.top - pad.bottom) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, y); ctx.lineTo(width - pad.right, y); ctx.stroke();
    const value = max - ((max - min) * i) / 4;
    ctx.fillText(Number.isInteger(value) ? String(value) : value.toFixed(2), 4, y + 4);
  }
}

// series: [{name, points: [[x, y], ...]}]; x is a number (e.g. time in ms).
export function lineChart(canvas, series) {
  const { ctx, width, height } = setup(canvas);
  const pad = { left: 48, right: 12, top: 10, bottom: 18 };
  const all = series.flatMap((s) => s.points);
  if (!all.length) { ctx.fillStyle = '#6b7280'; ctx.fillText('no data yet', pad.left, height / 2); return; }
  let [minX, maxX] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [minY, maxY] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (maxX === minX) maxX = minX + 1;
  if (maxY === minY) { maxY += 1; minY -= 1; }
  axes(ctx, width, height, minY, maxY, pad);
  const sx = (x) => pad.left + ((x - minX) / (maxX - minX)) * (width - pad.left - pad.right);
  const sy = (y) => pad.top + ((maxY - y) / (maxY - minY)) * (height - pad.top - pad.bottom);
  series.forEach((s, i) => {
    ctx.strokeStyle = color(i); ctx.fillStyle = color(i); ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach(([x, y], j) => (j ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
    ctx.stroke();
    s.points.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(sx(x), sy(y), 2.5, 0, Math.PI * 2); ctx.fill(); });
  });
}

// Stacked bars: labels.length buckets; series: [{name, values: [...]}].
export function barChart(canvas, buckets, series) {
  const { ctx, width, height } = setup(canvas);
  const pad = { left: 48, right: 12, top: 10, bottom: 18 };
  const totals = Array.from({ length: buckets }, (_, i) => series.reduce((a, s) => a + s.values[i], 0));
  const max = Math.max(1, ...totals);
  axes(ctx, width, height, 0, max, pad);
  const bw = (width - pad.left - pad.right) / buckets;
  const scale = (height - pad.top - pad.bottom) / max;
  for (let i = 0; i < buckets; i += 1) {
    let y = height - pad.bottom;
    series.forEach((s, k) => {
      const h = s.values[i] * scale;
      ctx.fillStyle = color(k);
      ctx.fillRect(pad.left + i * bw + 1, y - h, Math.max(1, bw - 2), h);
      y -= h;
    });
  }
}

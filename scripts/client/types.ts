// Type checks of the client's declarations (src/web/rollingpaper-client.d.ts)
// in a page, under `strict` with the DOM's types: run by scripts/client-test.sh
// (`tsc --noEmit --strict`), never executed. examples/node.ts checks Node's side.
import { RollingPaper, type EditRef, type NoteEditRef } from '../../src/web/rollingpaper-client.js';

// The browser's own WebSocket is accepted, without a cast.
const rp = new RollingPaper({ url: 'http://127.0.0.1:8080', paper: 'birthday-kim', name: 'Ann', WebSocket });
// Something that is not a WebSocket is not.
// @ts-expect-error: no handlers, send or close
new RollingPaper({ paper: 'birthday-kim', WebSocket: class { readyState = 0; } });
declare const Textual: new (url: string) => Omit<WebSocket, 'onmessage'> & { onmessage: ((event: { text: string }) => void) | null };
// @ts-expect-error: its messages have no `data`
new RollingPaper({ paper: 'birthday-kim', WebSocket: Textual });

// Every edit returns the ref its outcome carries, and the note's id where it names one.
const created: NoteEditRef = rp.create({ kind: 'text', text: 'Happy birthday!' });
const replaced: NoteEditRef = rp.replace(created.id, { kind: 'text', text: 'Happy birthday, Kim!' });
const patched: NoteEditRef = rp.patch(created.id, { x: 40, y: 80 });
const removed: NoteEditRef = rp.remove(created.id);
const cover: EditRef = rp.setCover({ title: 'Happy birthday, Kim', to: 'Kim' });
const sealed: { ref: string | null } = rp.complete();
rp.on('completed', ({ ref }) => console.log(ref === sealed.ref));
rp.on('saved', ({ ref }) => console.log([created, replaced, patched, removed, cover].some((e) => e.ref === ref)));
// @ts-expect-error: a cover is an object
rp.setCover('oops');
// @ts-expect-error: a note's data is an object
rp.create(['a']);
